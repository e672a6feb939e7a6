"""The multi-node cluster fixture: a head plus two worker nodes with private /tmp (see ``skyray.devcluster``).

Renders run as real ``skyray`` processes against the cluster (``--address``), the way users run them; every test
keeps its storyboards, inputs and ``--out`` under the driver's /tmp, which the worker nodes cannot see.
"""

from __future__ import annotations

import pytest

from skyray.devcluster import start_cluster, stop_cluster, unshare_problem


@pytest.fixture(scope="module")  # gone before other modules run: nothing else may join it by accident
def cluster(tmp_path_factory):
    why = unshare_problem()
    if why:
        pytest.fail(why)  # CI runs as root: a cluster that cannot start is a failure, not a skip
    c, head = start_cluster(tmp_path_factory.mktemp("cluster-logs"))
    try:
        yield c
    finally:
        stop_cluster(c, head)
