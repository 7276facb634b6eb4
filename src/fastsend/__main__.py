from fastsend.cli import run_process

run_process()
