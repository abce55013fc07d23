"""How any stage runs: its plan and content key (`runner`, `code_version`), reuse or work under a lock,
the manifest written last, progress lines, and the watchdog that keeps children from outliving a run.
Stages import this package; it imports no stage."""
