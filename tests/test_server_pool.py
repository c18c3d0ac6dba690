"""Several policy servers behind one Engine: an episode's turns stay on one server (its prefix
cache), a push updates every server, the version check sees the oldest, and a dead server's
episodes move to the others as retried infrastructure failures."""

import pytest

from tau2jax.data.tokenizer import load_tokenizer
from tau2jax.inference.engine import SamplingParams, ScriptedEngine
from tau2jax.inference.server import RunningServer, Server, create_app
from tau2jax.inference.server_pool import ServerPool
from tau2jax.inference.sglang_client import EngineUnavailableError, SGLangEngine


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


class _Echo(ScriptedEngine):
    """Answers every prompt with "ok" forever; takes any weights (the version is what is checked)."""

    def __init__(self, tok):
        super().__init__(tok, [])

    def generate(self, input_ids, params):
        self.responses = ["ok<|im_end|>"] * len(input_ids)
        return super().generate(input_ids, params)

    def update_weights(self, params, version):
        self.policy_version = version


def _servers(tok, n):
    return [RunningServer(create_app(Server(_Echo(tok), tok))) for _ in range(n)]


def _pool(running, **kw):
    return ServerPool([SGLangEngine(r.url, max_retries=0, timeout_s=5) for r in running], **kw)


def test_an_episode_stays_on_one_server_and_episodes_spread(tok):
    running = _servers(tok, 3)
    try:
        pool = _pool(running)
        stop = (tok.im_end_id,)
        for ep in range(24):
            for _turn in range(3):
                pool.generate([[1, 2, 3]], SamplingParams(affinity=f"mock/t{ep}/0/7", stop_token_ids=stop))
        per_episode = {pool.pick(f"mock/t{ep}/0/7").url for ep in range(24)}
        assert len(per_episode) == 3  # every server gets episodes
        assert sum(pool.routed.values()) == 72 and all(n % 3 == 0 for n in pool.routed.values())
    finally:
        for r in running:
            r.stop()


def test_a_push_reaches_every_server_and_the_version_is_the_oldest(tok, tmp_path, monkeypatch):
    from tau2jax.inference import server as server_mod

    monkeypatch.setattr(server_mod, "load_hf_params", lambda path: ({}, None))
    running = _servers(tok, 2)
    try:
        pool = _pool(running)
        assert pool.served_version() == 0
        pool.update_weights(str(tmp_path), 5)
        assert [s.served_version() for s in pool.servers] == [5, 5] and pool.served_version() == 5
        # one server falls behind (restarted, resynced; from another dir: our server refuses an
        # older version from the dir it last loaded, issue 33)
        pool.servers[1].update_weights(str(tmp_path / "other" / "v3"), 3)
        assert pool.served_version() == 3
    finally:
        for r in running:
            r.stop()


def test_a_dead_servers_episodes_move_to_the_others(tok):
    running = _servers(tok, 3)
    try:
        pool = _pool(running)
        key = "mock/t1/0/7"
        victim = pool.pick(key)
        others = {s.url for s in pool.servers} - {victim.url}
        moved_before = {k: pool.pick(k).url for k in (f"mock/t{i}/0/7" for i in range(30))}
        next(r for r in running if r.url == victim.url).stop()
        with pytest.raises(EngineUnavailableError):  # the episode fails as infrastructure: it is retried
            pool.generate([[1, 2]], SamplingParams(affinity=key, stop_token_ids=(tok.im_end_id,)))
        [r] = pool.generate([[1, 2]], SamplingParams(affinity=key, stop_token_ids=(tok.im_end_id,)))
        assert r.finish_reason == "stop" and pool.pick(key).url in others
        # only the dead server's episodes moved
        assert all(pool.pick(k).url == u for k, u in moved_before.items() if u != victim.url)
    finally:
        for r in running:
            r.stop()


def test_engine_url_lists_servers(tok):
    from tau2jax.config import default_config
    from tau2jax.stages.builders import sglang_engine

    running = _servers(tok, 2)
    try:
        c = default_config()
        c.engine.url = ",".join(r.url for r in running)
        engine = sglang_engine(c)
        assert isinstance(engine, ServerPool) and engine.urls == [r.url for r in running]
        c.engine.url = running[0].url
        assert isinstance(sglang_engine(c), SGLangEngine)
    finally:
        for r in running:
            r.stop()
