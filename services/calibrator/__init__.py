"""The calibrator service: measures per-model skip profiles on a job queue in Redis and
serves the ops API (ffnskip/v1/calibrator.proto)."""
