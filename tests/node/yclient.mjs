// One unmodified Yjs client (yjs + y-websocket's WebsocketProvider) driven over stdin.
//
//   node yclient.mjs <url> <room> <ticket> [name]
//
// Commands, one JSON object a line on stdin; reports, one JSON object a line on stdout:
//   {"cmd": "type", "chars": "...", "delay_ms": 2}  insert each char at a random spot
//                                                   -> {"event": "typed"}
//   {"cmd": "paste", "chars": "x", "count": 5000}  insert chars * count at the start, one
//                                                   transaction -> {"event": "pasted"}
//   {"cmd": "text"}                                 -> {"event": "text", "text": "..."}
//   {"cmd": "wait_contains", "chars": "..."}        once the text holds every char
//                                                   -> {"event": "text", "text": "..."}
//   {"cmd": "wait_synced"}                          -> {"event": "synced"}
//   {"cmd": "awareness"}                            -> {"event": "awareness", "states": [...]}
//   {"cmd": "ticket", "ticket": "..."}              the refresh hook: provider.params.ticket
//   {"cmd": "exit"}
// Unprompted: {"event": "status", "status": ...}, {"event": "sync", "synced": bool} and
// {"event": "close", "code": n, "reason": "..."} for every closed connection.
import readline from 'node:readline'
import WebSocket from 'ws'
import { WebsocketProvider } from 'y-websocket'
import * as Y from 'yjs'

const [url, room, ticket, name = 'node'] = process.argv.slice(2)
const say = (message) => process.stdout.write(JSON.stringify(message) + '\n')

const doc = new Y.Doc()
const content = doc.getText('content')
const provider = new WebsocketProvider(url, room, doc, {
  WebSocketPolyfill: WebSocket,
  params: { ticket },
  maxBackoffTime: 300,
  disableBc: true
})
provider.awareness.setLocalStateField('user', { name })
provider.on('status', (event) => say({ event: 'status', status: event.status }))
provider.on('sync', (synced) => say({ event: 'sync', synced }))
provider.on('connection-close', (event) =>
  say({ event: 'close', code: event ? event.code : null, reason: event ? String(event.reason) : '' })
)

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms))

const waiting = new Set() // [chars, resolve]
content.observe(() => {
  for (const entry of waiting) {
    if (holds(entry[0])) {
      waiting.delete(entry)
      entry[1]()
    }
  }
})
const holds = (chars) => {
  const text = content.toString()
  return [...chars].every((c) => text.includes(c))
}

const commands = {
  async type ({ chars, delay_ms: delay = 0 }) {
    for (const c of chars) {
      const at = Math.floor(Math.random() * (content.length + 1))
      content.insert(at, c)
      if (delay > 0) await sleep(delay)
    }
    say({ event: 'typed' })
  },
  async paste ({ chars, count }) {
    content.insert(0, chars.repeat(count))
    say({ event: 'pasted' })
  },
  async text () {
    say({ event: 'text', text: content.toString() })
  },
  async wait_contains ({ chars }) {
    if (!holds(chars)) await new Promise((resolve) => waiting.add([chars, resolve]))
    say({ event: 'text', text: content.toString() })
  },
  async wait_synced () {
    if (!provider.synced) await new Promise((resolve) => provider.once('sync', resolve))
    say({ event: 'synced' })
  },
  async awareness () {
    const states = [...provider.awareness.getStates().entries()]
      .filter(([client]) => client !== doc.clientID)
      .map(([, state]) => state)
    say({ event: 'awareness', states })
  },
  async ticket ({ ticket }) {
    provider.params.ticket = ticket
    say({ event: 'ticket' })
  },
  async exit () {
    provider.destroy()
    process.exit(0)
  }
}

readline.createInterface({ input: process.stdin }).on('line', (line) => {
  if (!line.trim()) return
  const command = JSON.parse(line)
  commands[command.cmd](command).catch((error) => say({ event: 'error', message: String(error) }))
})
process.stdin.on('end', () => process.exit(0))
