"""The ffnskip services: calibrator, decoder, gateway (each runs as `python -m services.<name>.main`)."""
