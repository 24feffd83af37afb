"""The console commands: engine-run (run), engine-extract (extract), engine-sweep (sweep/), engine-ray (cluster/).
The engine never imports them."""
