"""Calibration: measure how much each FFN block changes the hidden state (`calibrate`),
find the cold regions, tune a skip profile to a target by real runs (`tuning`, `runs`),
plot the similarity (`plots`), and score generations against dense (`scores`)."""
