"""`python tune/weights.py …` and `python -m tune.weights …`, the commands as the README names them: tune/cli/weights.py."""
if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script run from any working copy
    from tune.cli.weights import main

    sys.exit(main())
