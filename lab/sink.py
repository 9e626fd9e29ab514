"""The lab's "internet" host: accepts TCP on a few ports and answers one line, so tests can
see which destinations a device reaches. Run as: python -m lab.sink --ports 80,443"""
import argparse
import asyncio
import os
import signal


async def _answer(reader, writer):
    port = writer.get_extra_info("sockname")[1]
    try:
        writer.write(f"sink {port}\n".encode())
        await writer.drain()
        await asyncio.wait_for(reader.read(4096), 5)
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()


async def serve(ports, bind="0.0.0.0"):
    return [await asyncio.start_server(_answer, bind, p, backlog=1024, reuse_address=True)
            for p in ports]


async def _main(args):
    servers = await serve([int(p) for p in args.ports.split(",")], args.bind)
    if args.ready_file:
        tmp = args.ready_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, args.ready_file)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m lab.sink")
    ap.add_argument("--ports", default="80,443")
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--ready-file")
    asyncio.run(_main(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
