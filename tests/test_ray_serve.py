"""Streams on Ray Serve (rnnengine.scoring.ray_serve): sessions stay on one replica, give
exactly what a local stream gives, and when their replica is killed they continue exactly on
another one from their state bytes (a session without them is refused, never restarted)."""
import numpy as np
import pytest

import rnnengine

serve = pytest.importorskip("ray.serve")
ray = pytest.importorskip("ray")

rng = np.random.default_rng(5)
I, H = 4, 6


def f32(*shape, scale=0.5):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def replica_actor(unique_id):
    """The actor of the Serve replica with this id (its name holds the id)."""
    from ray.util import list_named_actors
    names = [a for a in list_named_actors(all_namespaces=True) if unique_id in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])


def holder(session):
    """The replica holding the session as its client left it (asked until a call reaches it)."""
    for _ in range(50):
        where = session.where()
        if where is not None:
            return where
    raise AssertionError(f"no replica holds session {session.session_id} at call {session.calls}")


def test_sessions_stay_on_their_replica_and_move_exactly_when_it_dies(tmp_path, monkeypatch):
    # Ray's workers start in the driver's directory: not the source tree (tests/test_scoring.py)
    monkeypatch.chdir(tmp_path)
    from rnnengine.scoring.ray_serve import RemoteSession, SessionLostError, StreamDeployment
    model = rnnengine.Model([rnnengine.GRU(f32(1, 3 * H, I), f32(1, 3 * H, H), f32(1, 6 * H)),
                             rnnengine.LSTM(f32(1, 4 * H, H), f32(1, 4 * H, H))])
    path = str(tmp_path / "m.rnne")
    rnnengine.save(model, path)
    local = rnnengine.load(path)
    n, T = 6, 10
    X = [f32(T, 1, I, scale=1.0) for _ in range(n)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        app = StreamDeployment.options(num_replicas=2, ray_actor_options={"num_cpus": 0.5}).bind(path)
        # handles only, no HTTP: without the proxy actor, whose start timed out on a loaded
        # 2-core machine (Ray killed it: ActorDiedError in serve.run)
        serve.start(proxy_location="Disabled")
        handle = serve.run(app, name="rnne", route_prefix=None)
        sessions = [RemoteSession(handle) for _ in range(n)]
        # no checkpoints: a call routed to a replica that does not hold it (best-effort routing,
        # before Serve's routers learn where the session is) is tried again, not lost
        bare = RemoteSession(handle, checkpoint=False)
        refs = [local.stream(1) for _ in range(n)]
        bare_ref = local.stream(1)
        for t in range(4):
            for k, (s, r) in enumerate(zip(sessions, refs)):
                np.testing.assert_array_equal(s.step(X[k][t]), r.step(X[k][t]))
            np.testing.assert_array_equal(bare.feed(X[0][t:t + 1]), bare_ref.feed(X[0][t:t + 1]))
        # Serve's multiplexed routing sends a session's calls to the replica holding it (best
        # effort: a call routed elsewhere is refused there and the session restored, exactly)
        holders = [holder(s) for s in sessions]
        victim = holder(bare)
        # kill the replica holding the unchecked session (and whichever others it holds)
        ray.kill(replica_actor(victim), no_restart=True)
        for t in range(4, T):  # the sessions continue exactly, wherever they are now
            for k, (s, r) in enumerate(zip(sessions, refs)):
                before = s.moves
                np.testing.assert_array_equal(s.step(X[k][t]), r.step(X[k][t]))
                if t == 4 and holders[k] == victim:
                    assert s.moves > before, k  # its replica is gone: it was restored elsewhere
        for s in sessions:
            assert holder(s) != victim
        # a reset counts as a call: the session starts again from the initial state
        sessions[0].reset()
        fresh = local.stream(1)
        for t in range(3):
            np.testing.assert_array_equal(sessions[0].step(X[1][t]), fresh.step(X[1][t]))
        with pytest.raises(SessionLostError, match="no state to restore it from.*checkpoint=False"):
            bare.step(X[0][4])
        # a state from another model is refused by the replica, not loaded
        other = RemoteSession(handle)
        other.state, other.calls = rnnengine.state_to_bytes(rnnengine.Model([rnnengine.GRU(
            f32(1, 3 * H, I), f32(1, 3 * H, H))]).stream(1)), 3
        with pytest.raises(Exception, match="another model"):
            other.step(X[0][0])
    finally:
        serve.shutdown()
        ray.shutdown()
