"""`python tune/promote.py …` and `python -m tune.promote …`, the commands as the README names them: tune/cli/promote.py."""
if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script run from any working copy
    from tune.cli.promote import main

    sys.exit(main())
