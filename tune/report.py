"""`python tune/report.py …` and `python -m tune.report …`, the commands as the README names them: tune/cli/report.py."""
if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a script run from any working copy
    from tune.cli.report import main

    sys.exit(main())
