import sys

from app import interrupts

interrupts.install()  # before the rest loads: a stop during start-up is one line, never a traceback
try:
    from app.cli import main
    from app.runner import exit_after_run

    code = main()
except interrupts.Stopped as stop:  # before main() took over
    print(f"{stop} during start-up (exit {stop.exit_code})", file=sys.stderr)
    sys.exit(stop.exit_code)
if sys.argv[1:2] == ["train"]:
    exit_after_run(code)
sys.exit(code)
