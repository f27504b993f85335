"""`chemfl report`: loss curves, facility timelines, update tallies and node-hour accounting of
finished runs, as PNG figures and a markdown summary.

`runs` reads run folders into plain dataclasses and does every computation (pure, no plotting);
`plots` draws the figures with matplotlib (Agg); `summary` writes summary.md; `cli` wires the
`report` sub-command and writes the report folder atomically.
"""
