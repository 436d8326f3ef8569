"""Live monitor for sftbench runs and sweeps (reads the JSONL run logs; never imports torch or deepspeed).

Modules:

* ``tail``     incremental readers: one rank file by byte offset, one run directory, cheap probes of many runs,
               discovery of the newest run.
* ``gpu``      GPU (NVML) and host (psutil) sources behind a small interface, with fakes for tests.
* ``state``    pure run state (ranks, runs), every number of the run header, the status labels and styles.
* ``rows``     the run view's formatted rows: rank table, charts, GPU table (processes matched to ranks), host, RSS.
* ``table``    the sweep / results table: one entry per run, its status, sort orders, rows and JSON.
* ``session``  glue: what to show (run / sweep / results / follow newest) and one poll per tick.
* ``snapshot`` the plain-text ``--once`` rendering.
* ``app``      the Textual application (imported only when the UI runs).
"""
