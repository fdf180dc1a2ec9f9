"""bench_train's parts: spec and data, the plain-loop model, the three runners, the lockstep driver, the report."""
