// The Node peer in bench/documents.py: Hocuspocus as it ships, documents in memory.
//
//   node bench/node/hocuspocus.mjs <port>
//
// No extensions (no database, no Redis), no authentication hook: every document lives
// in this process's memory. Prints {"port": n} once it listens.
import { Server } from '@hocuspocus/server'

const port = Number(process.argv[2] || 0)
const server = new Server({ port, address: '127.0.0.1', quiet: true, stopOnSignals: true })
await server.listen()
process.stdout.write(JSON.stringify({ port: server.address.port }) + '\n')
