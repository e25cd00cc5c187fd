"""zps lab: tools to study a job rather than run one.

The network emulator behind ``--net`` (:mod:`.network`, relays the launcher runs between workers and servers),
``zps experiment`` (:mod:`.experiment`: sweeps of configurations over seeds, into tables and plots), ``zps plan``
(:mod:`.planner`: a step time predicted from a calibrated model) and ``zps chaos`` (:mod:`.chaos`: roles killed at
random, then the job checked). The launcher imports it; it imports the packages below it, never the launcher.
"""
