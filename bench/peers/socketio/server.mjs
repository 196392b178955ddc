// Benchmark peer: Socket.IO 4, websocket transport only, rooms with io.to(room).emit.
// Clients connect to /socket.io/?EIO=4&transport=websocket&room=NAME and emit "msg" with a string;
// every socket of the room, sender included, receives it as 42["msg","<payload>"].
import { createServer } from "node:http";
import { Server } from "socket.io";

const port = Number(process.argv[2]);
const httpServer = createServer();
const io = new Server(httpServer, { transports: ["websocket"], serveClient: false });

io.on("connection", (socket) => {
  const room = String(socket.handshake.query.room ?? "");
  socket.join(room);
  socket.on("msg", (data) => {
    if (typeof data === "string") io.to(room).emit("msg", data);
  });
});

httpServer.listen(port, "127.0.0.1", 4096, () => console.error(`socketio peer listening on 127.0.0.1:${port}`));
