"""Rank r > 0 of a job on several devices: `python -m workers.rl.follower RANK WORLD PORT TIMEOUT PARENT`.

Started by rank 0 (`launch.ranks_of`), it joins the job's process group through rank 0's TCP store
on the loopback port, takes the job's row and the settings from rank 0, and runs the same loop as
rank 0 without the database, the object store or the grader (`launch.RankContext`). It leaves the
signals of a terminal or a stopping worker to rank 0, which tells it when to stop, and dies with it.
"""

from __future__ import annotations

import signal
import sys
from datetime import timedelta


def main(argv: list[str]) -> None:
    rank, world, port, timeout, parent = int(argv[0]), int(argv[1]), int(argv[2]), float(argv[3]), int(argv[4])
    from workers.rl.launch import die_with_parent

    die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    import torch.distributed as dist

    from workers.rl.launch import RankContext, join
    from workers.rl.loop import train
    from workers.rl.ranks import Ranks

    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=timedelta(seconds=timeout))
    join(store, rank, world, timeout)
    ranks = Ranks(rank, world)
    job, settings, ranks.sharded = ranks.broadcast(None)
    train(RankContext(ranks, job, settings, None))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
