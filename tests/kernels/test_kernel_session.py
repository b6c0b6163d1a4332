"""attnopt.kernels.session: one active decode session at a time, found by its kind; suspended while attnopt compiles."""

from attnopt.kernels import session
from attnopt.kernels.dynamic.session import PageSession
from attnopt.kernels.linear.decode import RecurrentSession


def test_a_site_finds_the_active_session_of_its_kind_only_and_none_while_suspended():
    paged, recurrent = PageSession(), RecurrentSession()
    assert session.current(PageSession) is None
    with session.active(paged):
        assert session.current(PageSession) is paged and session.current(RecurrentSession) is None
        with session.active(recurrent):
            assert session.current(RecurrentSession) is recurrent and session.current(PageSession) is None
        with session.suspended():
            assert session.current(PageSession) is None
        assert session.current(PageSession) is paged
    assert session.current(PageSession) is None
