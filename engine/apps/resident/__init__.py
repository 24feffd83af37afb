"""The resident engine: `engine-run --keep-alive 10m` leaves its engine loaded after the run, in a background process
of its own, and the next engine-run with the same engine settings, from the same folder, hands it its records
instead of starting one (start-up in milliseconds instead of seconds). Every engine-run keeps its own reading,
resume, lock and writer; only the generation moves.

- server.py: the resident process: one Engine, one job at a time over a Unix socket, gone after keep-alive idle
  seconds, after an interrupted or failed job, or when an engine-run with other settings asks for the device.
- client.py: what engine-run uses in place of an Engine: finds or starts the resident process, and runs a job in it.
- cli.py: `python -m engine.apps.resident status|stop`.
"""
