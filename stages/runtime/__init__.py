"""How every stage runs and fails: the params.yaml schema every stage checks first (params),
atomic byte-stable writers (outputs), one-line errors with deferred Ctrl-C (failures), and
the machine a run is on (machine)."""
