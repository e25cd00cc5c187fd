"""The cap on embedding tables per job (``--max-tables``): a worker declaring tables past it is refused by name,
the tables within it keep training, and the server keeps serving (issue 23)."""

from __future__ import annotations

import pytest
import torch

from zps.protocol.config import ConfigError, JobConfig
from zps.protocol.messages import ErrorCode, Kind, ProtocolError
from zps.protocol.tables import TableSpec
from zps.worker import EmbeddingTable

from .helpers import close_all, local_cluster
from .test_hardening import ask, assert_serves, dealer, head


@pytest.mark.unit
def test_the_table_cap_is_a_job_setting_with_a_floor() -> None:
    assert JobConfig().max_tables == 64
    assert JobConfig(max_tables=3).max_tables == 3
    with pytest.raises(ConfigError, match="ZPS_MAX_TABLES"):
        JobConfig(max_tables=0)


@pytest.mark.cluster
def test_tables_past_the_cap_are_refused_by_name_and_the_server_goes_on() -> None:
    with local_cluster(1, 1, max_tables=2) as cluster:
        client, = cluster.clients()
        raw = dealer(client.topology.servers[0])
        try:
            kept = EmbeddingTable("kept", 4, mode="sum", optimizer="sgd:lr=1.0", client=client)
            EmbeddingTable("second", 4, client=client)
            # a hostile worker (any worker's identity: no --secure here) declares 50 more: each refused
            for i in range(50):
                reply = ask(raw, [head("table", body=TableSpec(f"extra{i}", 4).to_body())])
                assert reply.kind is Kind.ERROR, reply.body
                assert reply.body["code"] == ErrorCode.TOO_LARGE.value, reply.body
                assert "--max-tables" in reply.body["reason"] and "2 tables already" in reply.body["reason"]
            assert len(cluster.servers[0].shard.tables) == 2
            # a table declared already is no new table: declaring it again is answered
            again = ask(raw, [head("table", body=kept.spec.to_body())])
            assert again.kind is Kind.OK and again.body["step"] == 0, again.body
            # the worker's own declaration past the cap fails with the server's reason
            with pytest.raises(ProtocolError, match="--max-tables") as refused:
                EmbeddingTable("third", 4, client=client)
            assert refused.value.code is ErrorCode.TOO_LARGE
            # and the tables within the cap still train
            ids = torch.tensor([[3, 7]])
            before = kept.rows(torch.tensor([3, 7]))
            kept(ids).sum().backward()  # d(sum)/d(row) = 1: SGD lr 1 takes 1 off every element of both rows
            kept.synchronize()
            assert torch.equal(kept.rows(torch.tensor([3, 7])), before - 1.0)
            assert_serves(raw)
        finally:
            raw.close()
            close_all([client])
