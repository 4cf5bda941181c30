// One load process of bench/documents.py: WebSocket clients of one or more documents.
//
//   node bench/node/load.mjs '<config JSON>'
//
// config: {"protocol": "y-websocket" | "hocuspocus", "out": "<path prefix>",
//          "clients": [{"url": "ws://...", "doc": "<hocuspocus document name>",
//                       "id": <global client index>, "sends": true|false,
//                       "measures": true|false}, ...],
//          "rate": <keystrokes a second per sender>, "senders": <senders in the whole run>}
//
// Every client is a raw protocol connection that counts the frames it receives without
// applying them; a client with "measures" (the default) also timestamps the keystrokes
// each carries (Y.decodeUpdate reads them), which costs the load process more.
// A sending client also owns a real Y.Doc (clientID 1000 + its id) and types one
// character per update at the end of its text, sending each update as a y-websocket
// (or Hocuspocus) sync update, on a fixed schedule: keystroke k of sender g is due at
// t0 + (k + g / senders) / rate. Times are CLOCK_MONOTONIC (process.hrtime), the clock
// Python's time.monotonic_ns() reads, so every process shares one time line.
//
// Commands on stdin, one a line; answers on stdout, one JSON object a line:
//   (on start, once every client has synced, one after another)  -> {"event": "ready"}
//   go <t0 ns> <seconds>   type from t0 for seconds      (no answer)
//   seed <chars> <chunk>   each sender types chars, chunk characters an update
//                                                     -> {"event": "seeded"}
//   history <updates> <chunk> <run>  the first sender types updates one-character
//                          keystrokes, run after run at random places, sent as updates
//                          of chunk keystrokes each
//                                                     -> {"event": "seeded"}
//   stats                  -> {"event": "stats", "frames": n, "bytes": n, "sent": n,
//                              "keystrokes": <others' keystrokes received>,
//                              "lag_p99_ms": x, "lag_max_ms": x,
//                              "loop_delay_p99_ms": x}  (this process's event loop:
//                              how late a received frame can be read and timestamped)
//   dump                   writes <out>.recv (float64 rows: sender, clock, length,
//                          ns after t0) and <out>.sent (sender, keystroke, ns after t0
//                          when it was sent, ns after t0 when it was due)
//                                                     -> {"event": "dumped"}
//   exit
//
// With "fetch": true in the config instead: the clients of "warmups", then those of
// "clients", connect and sync one after another, and the process prints the last one's
// {"event": "fetched", "ms": <socket opened to sync step 2>, "bytes": n,
// "chars": <length of content>} and exits.
import readline from 'node:readline'
import WebSocket from 'ws'
import * as Y from 'yjs'
import * as decoding from 'lib0/decoding'
import * as encoding from 'lib0/encoding'
import { writeFileSync } from 'node:fs'
import { monitorEventLoopDelay } from 'node:perf_hooks'

const config = JSON.parse(process.argv[2])
const hocuspocus = config.protocol === 'hocuspocus'
const say = (message) => process.stdout.write(JSON.stringify(message) + '\n')
const now = () => process.hrtime.bigint()

const SYNC = 0
const STEP1 = 0
const STEP2 = 1
const UPDATE = 2
const AUTH = 2
const FIRST_CLIENT = 1000

class Records {
  constructor (width) {
    this.width = width
    this.data = new Float64Array(width * 65536)
    this.length = 0
  }

  push (...values) {
    if (this.length + this.width > this.data.length) {
      const grown = new Float64Array(this.data.length * 2)
      grown.set(this.data)
      this.data = grown
    }
    this.data.set(values, this.length)
    this.length += this.width
  }

  write (path) {
    writeFileSync(path, new Uint8Array(this.data.buffer, 0, this.length * 8))
  }
}

const received = new Records(4)
const sent = new Records(4)
const loopDelay = monitorEventLoopDelay({ resolution: 1 })
const lags = []
let t0 = null
let frames = 0
let bytes = 0
let keystrokes = 0

function frame (doc, build) {
  const encoder = encoding.createEncoder()
  if (hocuspocus) encoding.writeVarString(encoder, doc)
  build(encoder)
  return encoding.toUint8Array(encoder)
}

class Client {
  constructor ({ url, doc, id, sends, measures = true }) {
    this.doc = doc
    this.id = id
    this.measures = measures
    this.synced = null
    this.syncedAt = null
    this.openedAt = null
    this.bytesAtSync = 0
    this.ydoc = sends ? new Y.Doc() : null
    if (this.ydoc) {
      this.ydoc.clientID = FIRST_CLIENT + id
      this.text = this.ydoc.getText('content')
      this.keystrokes = 0
      this.ydoc.on('update', (update) => this.send(frame(this.doc, (e) => {
        encoding.writeVarUint(e, SYNC)
        encoding.writeVarUint(e, UPDATE)
        encoding.writeVarUint8Array(e, update)
      })))
    }
    this.ready = new Promise((resolve) => { this.synced = resolve })
    this.openedAt = now()
    this.ws = new WebSocket(url, { perMessageDeflate: false })
    this.ws.binaryType = 'nodebuffer'
    this.ws.on('open', () => this.open())
    this.ws.on('message', (data) => this.receive(data))
    this.ws.on('close', (code, reason) => {
      if (!this.closing) say({ event: 'close', id: this.id, code, reason: String(reason) })
    })
    this.ws.on('error', (error) => say({ event: 'error', id: this.id, error: String(error) }))
  }

  send (data) {
    this.ws.send(data)
  }

  open () {
    if (hocuspocus) {
      this.send(frame(this.doc, (e) => {
        encoding.writeVarUint(e, AUTH)
        encoding.writeVarUint(e, 0) // a token message, empty: no onAuthenticate hook
        encoding.writeVarString(e, '')
      }))
    }
    this.send(frame(this.doc, (e) => {
      encoding.writeVarUint(e, SYNC)
      encoding.writeVarUint(e, STEP1)
      encoding.writeVarUint8Array(e, new Uint8Array([0])) // an empty state vector
    }))
  }

  receive (data) {
    const at = now()
    frames += 1
    bytes += data.length
    const decoder = decoding.createDecoder(data)
    if (hocuspocus) decoding.readVarString(decoder)
    if (decoding.readVarUint(decoder) !== SYNC) return // awareness, auth, sync status
    const step = decoding.readVarUint(decoder)
    if (step === STEP1) { // the server asks what we have: nothing it needs
      this.send(frame(this.doc, (e) => {
        encoding.writeVarUint(e, SYNC)
        encoding.writeVarUint(e, STEP2)
        encoding.writeVarUint8Array(e, new Uint8Array([0, 0]))
      }))
      return
    }
    const update = decoding.readVarUint8Array(decoder)
    if (step === STEP2 && this.syncedAt === null) {
      this.syncedAt = at
      this.state = update
      this.synced()
      return
    }
    if (t0 === null || !this.measures) return
    for (const struct of Y.decodeUpdate(update).structs) {
      const sender = struct.id.client - FIRST_CLIENT
      if (sender >= 0 && sender !== this.id) {
        received.push(sender, struct.id.clock, struct.length, Number(at - t0))
        keystrokes += struct.length
      }
    }
  }

  type (chars) {
    this.text.insert(this.text.length, chars)
  }
}

if (config.fetch) {
  // Connections opened before the one timed warm this process (ws, the JIT) up.
  let last = null
  for (const spec of [...(config.warmups || []), ...config.clients]) {
    last = new Client(spec)
    await last.ready
    last.closing = true
    last.ws.close()
  }
  const doc = new Y.Doc()
  Y.applyUpdate(doc, last.state)
  say({
    event: 'fetched',
    ms: Number(last.syncedAt - last.openedAt) / 1e6,
    bytes: last.state.length,
    chars: doc.getText('content').length
  })
  process.exit(0)
}

// One after another: pycrdt-websocket 0.16.5 can leave all but one of several clients
// that open a new room at the same instant without sync step 2.
const clients = []
for (const spec of config.clients) {
  const client = new Client(spec)
  clients.push(client)
  await client.ready
}
say({ event: 'ready' })

const senders = clients.filter((client) => client.ydoc)
const LETTERS = 'abcdefghijklmnopqrstuvwxyz'

function go (start, seconds) {
  t0 = start
  const period = 1e9 / config.rate
  const total = Math.floor(config.rate * seconds)
  const due = (client) => t0 + BigInt(Math.round((client.keystrokes + client.id / config.senders) * period))
  const tick = () => {
    let next = null
    const at = now()
    for (const client of senders) {
      while (client.keystrokes < total) {
        const when = due(client)
        if (when > at) {
          if (next === null || when < next) next = when
          break
        }
        client.type(LETTERS[client.keystrokes % 26])
        const sentAt = now()
        sent.push(client.id, client.keystrokes, Number(sentAt - t0), Number(when - t0))
        lags.push(Number(sentAt - when) / 1e6)
        client.keystrokes += 1
      }
    }
    if (next !== null) setTimeout(tick, Math.max(0, Number(next - now()) / 1e6))
  }
  const wait = Number(t0 - now()) / 1e6
  setTimeout(() => { loopDelay.enable(); tick() }, Math.max(0, wait))
}

function seed (chars, chunk) {
  for (const client of senders) {
    for (let i = 0; i < chars; i += chunk) {
      client.type(LETTERS.repeat(Math.ceil(chunk / 26)).slice(0, Math.min(chunk, chars - i)))
    }
  }
}

function history (updates, chunk, run) {
  // Keystrokes in runs of `run` characters at one place, each run at a random place
  // (run 1: every keystroke somewhere else, none merges with its neighbour: the worst
  // case for loading), made in a scratch document and sent as updates of `chunk`.
  const [client] = senders
  const scratch = new Y.Doc()
  scratch.clientID = client.ydoc.clientID + 1000000
  const text = scratch.getText('content')
  let before = Y.encodeStateVector(scratch)
  let random = 12345
  let at = 0
  for (let i = 0; i < updates; i++) {
    if (i % run === 0) {
      random = (random * 1103515245 + 12345) % 2147483648
      at = random % (text.length + 1)
    }
    text.insert(at, LETTERS[i % 26])
    at += 1
    if ((i + 1) % chunk === 0 || i + 1 === updates) {
      Y.applyUpdate(client.ydoc, Y.encodeStateAsUpdate(scratch, before))
      before = Y.encodeStateVector(scratch)
    }
  }
}

function stats () {
  const sorted = Float64Array.from(lags).sort()
  const at = (q) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.ceil(q * sorted.length) - 1)] : 0)
  say({
    event: 'stats',
    frames,
    bytes,
    keystrokes,
    sent: sent.length / 4,
    lag_p99_ms: at(0.99),
    lag_max_ms: sorted.length ? sorted[sorted.length - 1] : 0,
    loop_delay_p99_ms: loopDelay.count ? loopDelay.percentile(99) / 1e6 : 0
  })
}

const waitDrained = async () => {
  // Every update handed to ws has left this process.
  while (clients.some((client) => client.ws.bufferedAmount > 0)) {
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

readline.createInterface({ input: process.stdin }).on('line', async (line) => {
  const [command, ...args] = line.trim().split(/\s+/)
  if (command === 'go') go(BigInt(args[0]), Number(args[1]))
  else if (command === 'seed') {
    seed(Number(args[0]), Number(args[1]))
    await waitDrained()
    say({ event: 'seeded' })
  } else if (command === 'history') {
    history(Number(args[0]), Number(args[1]), Number(args[2] || 1))
    await waitDrained()
    say({ event: 'seeded' })
  } else if (command === 'stats') stats()
  else if (command === 'dump') {
    received.write(config.out + '.recv')
    sent.write(config.out + '.sent')
    say({ event: 'dumped' })
  } else if (command === 'exit') {
    for (const client of clients) {
      client.closing = true
      client.ws.close()
    }
    process.exit(0)
  }
})
