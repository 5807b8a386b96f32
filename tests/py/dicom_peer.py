#!/usr/bin/env python3
"""A DICOM peer built on pynetdicom (an implementation Kakehashi did not
write), for the conformance tests. Two roles:

  store  a storage SCU: sends files to the box and prints, as JSON, each
         request's presentation context, the context its response came on,
         and the status.
  scp    a storage SCP (a reading center): writes every dataset exactly as
         received (bytes, not re-encoded) to DIR/<SOP Instance UID>.dcm,
         answers with scripted statuses, and keeps statistics (largest
         P-DATA PDU received, requests per instance) in DIR/stats.json.
"""

import argparse
import json
import os
import sys
import threading
import time

from pydicom import dcmread
from pynetdicom import AE, evt, StoragePresentationContexts, ALL_TRANSFER_SYNTAXES, _config
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def store(args):
    # Send each file's dataset bytes as they are on disk (no decoding, no
    # conversion): what arrives at the center can then be compared byte for
    # byte with the file.
    _config.STORE_SEND_CHUNKED_DATASET = True
    datasets = [dcmread(f, stop_before_pixels=True) for f in args.files]
    ae = AE(ae_title=args.aet)
    ae.maximum_pdu_size = args.max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    pairs = []
    for ds in datasets:
        pair = (ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        if pair not in pairs:
            pairs.append(pair)
    if args.per_syntax:
        # One context per (SOP class, transfer syntax), as many modalities
        # propose, plus the other uncompressed syntaxes of each class as
        # contexts of their own: the box must answer on the one used.
        for cls in dict.fromkeys(c for c, _ in pairs):
            for ts in [EXPLICIT_LE, IMPLICIT_LE]:
                if (cls, ts) not in pairs:
                    ae.add_requested_context(cls, [ts])
        for cls, ts in pairs:
            ae.add_requested_context(cls, [ts])
    else:
        for cls, ts in pairs:
            ae.add_requested_context(cls, [ts])
    # Fill up with other storage classes (each offering two syntaxes).
    for cx in StoragePresentationContexts:
        if len(ae.requested_contexts) >= args.contexts:
            break
        if all(cx.abstract_syntax != c for c, _ in pairs):
            ae.add_requested_context(cx.abstract_syntax, [EXPLICIT_LE, IMPLICIT_LE])
    ext = []
    if args.async_window:
        item = AsynchronousOperationsWindowNegotiation()
        item.maximum_number_operations_invoked = args.async_window
        item.maximum_number_operations_performed = args.async_window
        ext.append(item)
    assoc = ae.associate(args.host, args.port, ae_title=args.aec, ext_neg=ext or None)
    out = {"established": assoc.is_established, "results": []}
    if not assoc.is_established:
        print(json.dumps(out))
        return 1
    out["accepted_contexts"] = len(assoc.accepted_contexts)
    out["proposed_contexts"] = len(ae.requested_contexts)
    # Which context each request went on, and each response came on.
    sent, received = [], []
    send_msg, get_msg = assoc.dimse.send_msg, assoc.dimse.get_msg

    def record_send(primitive, context_id):
        sent.append(context_id)
        return send_msg(primitive, context_id)

    def record_get(block=False):
        cx, msg = get_msg(block)
        if msg is not None:
            received.append(cx)
        return cx, msg

    assoc.dimse.send_msg, assoc.dimse.get_msg = record_send, record_get
    priority = {"low": 2, "medium": 0, "high": 1}[args.priority]
    for i, (path, ds) in enumerate(zip(args.files, datasets)):
        if i and args.gap:
            # A modality that sends slowly: the association stays open.
            time.sleep(args.gap)
        before = len(sent)
        status = assoc.send_c_store(path, priority=priority)
        out["results"].append(
            {
                "file": path,
                "status": int(status.Status) if status and "Status" in status else None,
                "req_cx": sent[before] if len(sent) > before else None,
                "rsp_cx": received[-1] if received else None,
            }
        )
    assoc.release()
    print(json.dumps(out))
    return 0


def scp(args):
    os.makedirs(args.dir, exist_ok=True)
    statuses = [int(s, 16) for s in args.statuses.split(",") if s] if args.statuses else []
    refuse = {u: int(s, 16) for u, s in (r.split("=") for r in args.refuse)} if args.refuse else {}
    lock = threading.Lock()
    stats = {"max_pdata": 0, "requests": {}, "stored": 0, "order": []}

    def save():
        tmp = os.path.join(args.dir, "stats.json.tmp")
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, os.path.join(args.dir, "stats.json"))

    def on_store(event):
        uid = event.request.AffectedSOPInstanceUID
        with lock:
            n = stats["requests"].get(uid, 0)
            stats["requests"][uid] = n + 1
            if uid in refuse:
                save()
                return refuse[uid]
            if n < len(statuses) and statuses[n] != 0:
                save()
                return statuses[n]
            raw = event.request.DataSet.getvalue()
            with open(os.path.join(args.dir, uid + ".dcm"), "wb") as f:
                f.write(raw)
            stats["stored"] += 1
            stats["order"].append(uid)
            save()
        return 0x0000

    def on_pdu(event):
        pdu = event.pdu
        if type(pdu).__name__ == "P_DATA_TF":
            length = len(pdu.encode()) - 6
            with lock:
                if length > stats["max_pdata"]:
                    stats["max_pdata"] = length

    ae = AE(ae_title=args.aet)
    ae.maximum_pdu_size = args.max_pdu
    ae.network_timeout = ae.dimse_timeout = 60
    # More at once are rejected: A-ASSOCIATE-RJ, transient, local limit exceeded.
    ae.maximum_associations = args.max_associations
    # Every storage class, in whatever syntax is proposed (like a real
    # archive that stores what it gets).
    for cx in StoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context("1.2.840.10008.1.1", [IMPLICIT_LE])
    save()
    ae.start_server(
        ("127.0.0.1", args.port),
        block=True,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_PDU_RECV, on_pdu)],
    )
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("store")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--aet", default="MODALITY1")
    s.add_argument("--aec", default="KAKEHASHI")
    s.add_argument("--max-pdu", type=int, default=16384)
    s.add_argument("--priority", choices=["low", "medium", "high"], default="medium")
    s.add_argument("--async-window", type=int, default=0)
    s.add_argument("--contexts", type=int, default=0, help="propose this many contexts in all")
    s.add_argument("--per-syntax", action="store_true")
    s.add_argument("--gap", type=float, default=0, help="seconds between one C-STORE's response and the next request")
    s.add_argument("files", nargs="+")
    c = sub.add_parser("scp")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--aet", default="READCENTER")
    c.add_argument("--dir", required=True)
    c.add_argument("--max-pdu", type=int, default=16384)
    c.add_argument("--statuses", default="", help="status per attempt of each instance, e.g. a700,a700 (then success)")
    c.add_argument("--refuse", action="append", help="UID=status, always")
    c.add_argument("--max-associations", type=int, default=10, help="associations served at once")
    args = p.parse_args()
    return store(args) if args.role == "store" else scp(args)


if __name__ == "__main__":
    sys.exit(main())
