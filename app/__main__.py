import sys

from app.cli import exit_after_run, main

code = main()
if sys.argv[1:2] == ["train"]:
    exit_after_run(code)
sys.exit(code)
