"""Verification and the association policy layer over real sockets."""

from __future__ import annotations

from pynetdicom import AE

from tests.helpers import associate, request_association

VERIFICATION = "1.2.840.10008.1.1"


def test_echo_on_both_archive_acceptors(suite):
    for key in ("storage_scp", "query_scp"):
        with associate(suite, key, [VERIFICATION]) as assoc:
            assert assoc.send_c_echo().Status == 0x0000


def test_wrong_called_ae_is_rejected_1_1_7(suite):
    ae = AE(ae_title="TEST_SCU")
    ae.add_requested_context(VERIFICATION)
    assoc = request_association(ae, "127.0.0.1", suite.port_of("storage_scp"), ae_title="NOT_ME")
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 7)
    # The server keeps serving.
    with associate(suite, "storage_scp", [VERIFICATION]) as assoc:
        assert assoc.send_c_echo().Status == 0x0000
