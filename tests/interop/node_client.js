// An ebbcast client on Node's `ws` (the package Node users pick), for the interop test.
// Usage: node node_client.js URL
// Prints every received frame as one line. Sends "hello from node" after the welcome;
// when the shutdown frame arrives, sends "still here"; when that comes back, closes 1000.
'use strict';
const WebSocket = require('ws');

const ws = new WebSocket(process.argv[2]);
ws.on('message', (data) => {
  const text = data.toString();
  console.log(text);
  const frame = JSON.parse(text);
  if (frame.type === 'welcome') ws.send('hello from node');
  if (frame.type === 'shutdown') ws.send('still here');
  if (frame.type === 'message' && frame.text === 'still here') ws.close(1000, 'bye');
});
ws.on('close', (code) => { console.log(JSON.stringify({ closed: code })); process.exit(0); });
ws.on('error', (err) => { console.error(String(err)); process.exit(1); });
