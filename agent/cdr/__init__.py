"""The PBX's own CDR: reading its CSV rows, following the file it appends to, and
settling calls from it (corrections of provisional settlements, reconciliation).

- :mod:`agent.cdr.formats`: the CSV layouts of Asterisk (``cdr_custom``,
  ``cdr_csv``) and FreeSWITCH (``mod_cdr_csv``), parsed sans-IO.
- :mod:`agent.cdr.follow`: the follower of a CDR file (rotation, partial lines,
  a persisted position).
- :mod:`agent.cdr.settle`: which calls a CDR row corrects, and applying it.
- :mod:`agent.cdr.reconcile`: every call of a CDR file against the ledger (pure).
- :mod:`agent.cdr.source`: the daemon's CDR source (follow, apply, remember).
"""
