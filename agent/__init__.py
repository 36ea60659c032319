"""callgate: call gating and prepaid metering beside an Asterisk or FreeSWITCH PBX.

Follow one call by folder: ``pbx/`` (wire protocols and adapters) -> ``gate/``
(policy and the pure decision) -> ``meter/`` (live calls, increments, deadlines)
-> ``ledger/`` (the money) -> ``events/`` (MQTT). ``daemon`` wires them;
``cli`` is the command line.
"""

__version__ = "0.1.0"
