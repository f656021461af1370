"""The ground floor every other part of the package stands on: nothing here imports from above.

``config`` (profiles, paths, run folders), ``artifacts`` (JSON/JSONL files with located errors, atomic writes),
``records`` (the grade scale and the prediction-row schema), ``resources`` (CPU time, memory and load probes)
and ``models`` (resolving and loading hub ids, local folders and the bundled offline models).
"""
