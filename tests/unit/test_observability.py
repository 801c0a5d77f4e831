from extauthz.observe.wiring import build_observers
from extauthz.settings import Settings


def test_no_observer_at_all_when_everything_is_off() -> None:
    obs = build_observers(Settings(tracing=False, decision_log="none"), environ={})
    try:
        assert obs.observers == ()
    finally:
        obs.close()


def test_the_decision_log_alone_still_observes() -> None:
    obs = build_observers(Settings(tracing=False, decision_log="stdout"), environ={})
    try:
        assert len(obs.observers) == 1
    finally:
        obs.close()
