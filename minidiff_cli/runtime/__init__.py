"""Where and how a job runs: threads, devices, the allocator, processes under torchrun, stop signals.

    threads.py      how many threads torch uses, following other work on the machine
    allocator.py    keeping freed memory for the next batch
    devices.py      --device and --dtype: auto, cpu, cuda, mps; copies to a GPU that do not stall it
    distributed.py  torchrun: the process group, each rank's device, agreeing across ranks
    ranks.py        sharing a generate job between torchrun's ranks
    signals.py      SIGTERM and Ctrl-C: finish the step, save, stop

May import: errors only.
"""
