// Writes atrium/static/editor.bundle.js (editor.js and everything it imports, minified)
// and atrium/static/editor.bundle.LICENSES.txt (the licence of every package in it).
// Run through ./build.sh, which installs package-lock.json's exact versions first.
import { readFileSync, readdirSync, writeFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'
import * as esbuild from 'esbuild'

const here = dirname(fileURLToPath(import.meta.url))
const out = join(here, '..', 'atrium', 'static', 'editor.bundle.js')

const result = await esbuild.build({
  entryPoints: [join(here, 'editor.js')],
  bundle: true,
  format: 'esm',
  platform: 'browser',
  target: 'es2020',
  minify: true,
  legalComments: 'none', // the licences go to the LICENSES file, whole
  metafile: true,
  write: false,
  outfile: out,
  logLevel: 'warning'
})

// The packages whose code is in the bundle: node_modules/<name>/ or node_modules/@scope/name/.
const names = new Set()
for (const input of Object.keys(result.metafile.inputs)) {
  const match = input.match(/node_modules\/((?:@[^/]+\/)?[^/]+)\//)
  if (match) names.add(match[1])
}
const packages = [...names].sort().map((name) => {
  const root = join(here, 'node_modules', name)
  const meta = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'))
  const files = readdirSync(root).filter((f) => /^(licen[cs]e|copying|notice)/i.test(f)).sort()
  if (files.length === 0) throw new Error(`${name} ships no licence file`)
  return { name, version: meta.version, license: meta.license, files, root }
})

const listed = packages.map((p) => `${p.name}@${p.version}`).join(' ')
const banner =
  `/* atrium/static/editor.bundle.js: ${listed}. Built by web/build.sh from ` +
  'web/package-lock.json; licences in editor.bundle.LICENSES.txt. Do not edit. */\n'
writeFileSync(out, banner + result.outputFiles[0].text)

const sections = packages.map((p) => {
  const texts = p.files.map((f) => readFileSync(join(p.root, f), 'utf8').trim())
  return `${p.name} ${p.version} (${p.license})\n${'-'.repeat(72)}\n${texts.join('\n\n')}\n`
})
writeFileSync(
  out.replace(/\.js$/, '.LICENSES.txt'),
  'The packages bundled into editor.bundle.js, and their licences.\n\n' +
    sections.join('\n')
)
console.log(`wrote ${out} (${banner.length + result.outputFiles[0].text.length} bytes): ${listed}`)
