"""The local stack of `ffnskip up`: child processes and their supervisor (`procs`) and the
stack that starts, serves and stops redis, calibrator, decoders and gateway (`local`)."""
