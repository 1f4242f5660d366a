"""One experiment class per module; the module name is the experiment's NAME (`make experiment NAME=...`)."""
