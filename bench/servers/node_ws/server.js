// The reference a user might pick instead: a broadcast server on Node's `ws` 8.
// Usage: node server.js PORT
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const port = Number(process.argv[2]);
const wss = new WebSocketServer({ host: '127.0.0.1', port, path: '/ws', backlog: 2048,
                                  perMessageDeflate: false, maxPayload: 1 << 20 });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => {
    for (const client of wss.clients) {
      if (client.readyState === WebSocket.OPEN) client.send(data, { binary: isBinary });
    }
  });
});
wss.on('listening', () => console.error(`serving ws=http://127.0.0.1:${port}/ws`));
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => process.exit(0));
