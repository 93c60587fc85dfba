"""Studies: arms (base model, SFT, DAIL, ...) evaluated on one held-out split and compared."""
