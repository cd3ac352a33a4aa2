"""The kubetune trainer: turns a FineTuneJob spec into a TRL/PEFT training run.

Importable without kopf; torch and friends are imported inside the functions that need them.
"""
