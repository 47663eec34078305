"""A small real RTSP server on loopback for the capture tests: H.264 over RTP, interleaved in
the RTSP TCP connection (RFC 2326 §10.12, RFC 6184 packetisation), as IP cameras do.

It answers OPTIONS, DESCRIBE, SETUP (TCP transport only), PLAY and TEARDOWN, then sends
`frames` encoded frames at `fps`. With `stall_after=N` it sends N frames and then keeps the
connection open without sending anything more, which is how a hung camera looks to a client.
"""

from __future__ import annotations

import socket
from fractions import Fraction
import struct
import threading
import time

import av

from video_fixtures import index_frame

MTU_PAYLOAD = 1200


def encode_h264(n: int, fps: int, width: int = 64, height: int = 48) -> list[list[bytes]]:
    """n frames as lists of NAL units (no start codes), SPS/PPS in band before each keyframe."""
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = Fraction(1, fps)
    codec.gop_size = fps
    codec.options = {"preset": "ultrafast", "tune": "zerolatency", "bframes": "0", "repeat-headers": "1"}
    out: list[list[bytes]] = []
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(index_frame(i, width, height), format="rgb24")
        frame.pts = i
        for pkt in codec.encode(frame):
            out.append(_split_annexb(bytes(pkt)))
    for pkt in codec.encode(None):
        out.append(_split_annexb(bytes(pkt)))
    return out


def _split_annexb(data: bytes) -> list[bytes]:
    nals, i, start = [], 0, None
    while i < len(data) - 3:
        if data[i:i + 3] == b"\x00\x00\x01":
            if start is not None:
                nals.append(data[start:i].rstrip(b"\x00"))
            start = i + 3
            i += 3
        else:
            i += 1
    if start is not None:
        nals.append(data[start:])
    return [n for n in nals if n]


def _rtp_packets(nal: bytes, seq: int, ts: int, marker: bool, ssrc: int = 0x1234) -> list[bytes]:
    def header(s: int, m: bool) -> bytes:
        return struct.pack(">BBHII", 0x80, (0x80 if m else 0) | 96, s & 0xFFFF, ts & 0xFFFFFFFF, ssrc)

    if len(nal) <= MTU_PAYLOAD:
        return [header(seq, marker) + nal]
    packets, nri_type, body = [], nal[0], nal[1:]
    chunks = [body[k:k + MTU_PAYLOAD] for k in range(0, len(body), MTU_PAYLOAD)]
    for j, chunk in enumerate(chunks):  # FU-A fragments
        start, end = j == 0, j == len(chunks) - 1
        fu_ind = (nri_type & 0xE0) | 28
        fu_hdr = (0x80 if start else 0) | (0x40 if end else 0) | (nri_type & 0x1F)
        packets.append(header(seq + j, marker and end) + bytes([fu_ind, fu_hdr]) + chunk)
    return packets


class RtspServer:
    def __init__(self, *, frames: int = 50, fps: int = 25, stall_after: int | None = None):
        self.fps, self.stall_after = fps, stall_after
        self.access_units = encode_h264(frames, fps)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.url = f"rtsp://127.0.0.1:{self.port}/live"
        self.sessions = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._stop.set()
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        self.sock.close()

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    buf += chunk
                head, buf = buf.split(b"\r\n\r\n", 1)
                lines = head.decode().split("\r\n")
                method = lines[0].split()[0]
                hdrs = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:] if ":" in ln)}
                cseq = hdrs.get("cseq", "0")
                if method == "OPTIONS":
                    self._reply(conn, cseq, "Public: OPTIONS, DESCRIBE, SETUP, PLAY, TEARDOWN\r\n")
                elif method == "DESCRIBE":
                    sdp = ("v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=framecast test\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                           "m=video 0 RTP/AVP 96\r\na=rtpmap:96 H264/90000\r\n"
                           "a=fmtp:96 packetization-mode=1\r\na=control:track0\r\n")
                    self._reply(conn, cseq, f"Content-Base: {self.url}/\r\nContent-Type: application/sdp\r\n"
                                f"Content-Length: {len(sdp)}\r\n", sdp)
                elif method == "SETUP":
                    if "TCP" not in hdrs.get("transport", ""):
                        self._reply(conn, cseq, "", status="461 Unsupported Transport")
                        continue
                    self._reply(conn, cseq, "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\nSession: 42\r\n")
                elif method == "PLAY":
                    self._reply(conn, cseq, "Session: 42\r\n")
                    self.sessions += 1
                    self._stream(conn)
                    return
                else:  # TEARDOWN and the rest
                    self._reply(conn, cseq, "")
                    return
        except OSError:
            return

    @staticmethod
    def _reply(conn: socket.socket, cseq: str, headers: str, body: str = "", status: str = "200 OK") -> None:
        conn.sendall(f"RTSP/1.0 {status}\r\nCSeq: {cseq}\r\n{headers}\r\n{body}".encode())

    def _stream(self, conn: socket.socket) -> None:
        seq, t0 = 0, time.monotonic()
        for i, nals in enumerate(self.access_units):
            if self._stop.is_set():
                return
            if self.stall_after is not None and i >= self.stall_after:
                self._stop.wait()  # connection open, nothing sent: a hung camera
                return
            delay = t0 + i / self.fps - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            ts = int(i * 90000 / self.fps)
            for k, nal in enumerate(nals):
                for pkt in _rtp_packets(nal, seq, ts, marker=k == len(nals) - 1):
                    conn.sendall(b"$\x00" + struct.pack(">H", len(pkt)) + pkt)
                    seq += 1
        self._stop.wait(0.5)


def main() -> None:  # manual check: python tests/rtsp_server.py, then `framecast run --source URL`
    srv = RtspServer(frames=750)
    print(srv.url, flush=True)
    time.sleep(30)


if __name__ == "__main__":
    main()
