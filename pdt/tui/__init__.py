"""The Textual TUI of PDT Workbench: a view over the job event stream.

What it is: the app (`app.py`, `run_tui()`), one screen per file under `screens/`, one widget per
file under `widgets/`, and the event sources the run screen reads (`event_source.py`). What it is
not: any job logic. Jobs run in child processes and talk to the TUI only through their
`events.jsonl`; nothing outside this package imports Textual.
"""
