// The entry of atrium/static/editor.bundle.js: the Yjs packages the demo's shared editor
// uses, as one ES module the page imports (no CDN, no npm at run time). The binding of a
// textarea to a Y.Text is atrium's own code, in atrium/static/shared-editor.js.
export * as Y from 'yjs'
export { WebsocketProvider } from 'y-websocket'
