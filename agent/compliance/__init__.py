"""Telemarketing compliance beside the gate: the live do-not-call copy, its sync, risk."""
