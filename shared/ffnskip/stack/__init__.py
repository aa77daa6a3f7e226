"""The local stack of `ffnskip up`: child processes and their supervisor (`procs`) and
the command that starts, serves and stops redis, calibrator, decoders and gateway (`up`)."""
