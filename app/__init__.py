"""The program's top: what an operator runs, above every other part of PreFT Serve.

The ``preft`` command line (:mod:`app.cli`), the launcher that starts Redis, Ray, the worker
pools and the router on one machine (:mod:`app.launcher`, with :mod:`app.redis_proc`), the
live view ``preft top`` (:mod:`app.top`), and the assets the program serves when given none:
the embedded demo model and adapters and the random-weight tiny model (:mod:`app.assets`,
built by :mod:`app.tiny` and :mod:`trainer.demo`, nothing downloaded). This package imports
every floor below it (front doors, pools, ground floor); nothing below imports it, except
the benchmarks, which start clusters with the launcher on these assets.
"""
