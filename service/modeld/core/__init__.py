"""The pure decision core: no I/O, no logging, no clock reads."""
