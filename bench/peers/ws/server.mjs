// Benchmark peer: the npm `ws` package with a per-room broadcast loop.
// GET /ws?room=NAME upgrades; every text message is sent to every socket of the room, sender included.
import { WebSocketServer } from "ws";

const port = Number(process.argv[2]);
const rooms = new Map(); // room name -> Set of sockets

const wss = new WebSocketServer({ host: "127.0.0.1", port, backlog: 4096, path: "/ws", perMessageDeflate: false });

wss.on("connection", (socket, req) => {
  const name = new URL(req.url, "http://x").searchParams.get("room") ?? "";
  let room = rooms.get(name);
  if (!room) rooms.set(name, (room = new Set()));
  room.add(socket);
  socket.on("message", (data, isBinary) => {
    if (isBinary) return;
    for (const peer of room) {
      if (peer.readyState === 1) peer.send(data, { binary: false });
    }
  });
  socket.on("close", () => {
    room.delete(socket);
    if (room.size === 0 && rooms.get(name) === room) rooms.delete(name);
  });
  socket.on("error", () => {});
});

wss.on("listening", () => console.error(`ws peer listening on 127.0.0.1:${port}`));
