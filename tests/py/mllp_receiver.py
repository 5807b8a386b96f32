#!/usr/bin/env python3
"""A hospital RIS's HL7 v2 interface for the tests: the `hl7` package's
MLLP server (Debian's python3-hl7), which we did not write. Every message
it receives is stored in --dir as NNNN.hl7 (one segment per line), and
answered with an ACK whose MSA-1 is --ack (AA: accepted; AE/AR: the RIS
refused it)."""

import argparse
import asyncio
import pathlib

from hl7.mllp import start_hl7_server


async def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", required=True)
    p.add_argument("--ack", default="AA", choices=["AA", "AE", "AR"])
    args = p.parse_args()
    out = pathlib.Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)

    async def client(reader, writer):
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                n = len(list(out.glob("*.hl7")))
                tmp = out / f".{n:04}.tmp"
                tmp.write_text(str(message).replace("\r", "\n"), encoding="utf-8")
                tmp.rename(out / f"{n:04}.hl7")
                writer.writemessage(message.create_ack(args.ack))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    server = await start_hl7_server(
        client, args.host, args.port, encoding="utf-8"
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
