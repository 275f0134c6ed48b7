from threads import one_thread  # noqa: F401  (autouse: one thread for this directory)
