// Open every page of the offline HTML book in headless Chromium (npm: @sparticuz/chromium +
// puppeteer-core, no system browser needed) and report what a reader would meet:
//   node scripts/browse_book.js _build/book/ci/html _build/screenshots/ci
//   node scripts/browse_book.js --pdf _build/book/embedded/html/print.html book.pdf   (print to PDF)
// Writes one PNG per page (a tall page in segments of at most 4,000 px: <page>.png, then
// <page>.part2.png, ...; one full-page capture of a very tall page repeats its top instead of
// showing the rest) and report.json: console errors, failed requests, images
// that did not load (or have zero natural size), raw TeX delimiters left in the text, and links
// between pages that do not resolve.
const fs = require('fs');
const path = require('path');
const chromium = require('@sparticuz/chromium');
const puppeteer = require('puppeteer-core');

const SEGMENT = 4000;  // px of page per screenshot

async function printPdf(htmlFile, pdfFile) {
  const browser = await puppeteer.launch({ args: chromium.args, executablePath: await chromium.executablePath(), headless: true });
  const page = await browser.newPage();
  await page.goto('file://' + path.resolve(htmlFile), { waitUntil: 'load' });
  await page.evaluate(() => document.fonts.ready);
  await page.pdf({ path: path.resolve(pdfFile), format: 'A4', printBackground: true,
                   margin: { top: '16mm', bottom: '16mm', left: '14mm', right: '14mm' } });
  await browser.close();
}

(async () => {
  if (process.argv[2] === '--pdf') { await printPdf(process.argv[3], process.argv[4]); return; }
  const [htmlDir, outDir] = process.argv.slice(2).map((p) => path.resolve(p));
  fs.mkdirSync(outDir, { recursive: true });
  const files = fs.readdirSync(htmlDir).filter((f) => f.endsWith('.html') && f !== 'print.html').sort();
  const browser = await puppeteer.launch({
    args: [...chromium.args, '--allow-file-access-from-files'],
    executablePath: await chromium.executablePath(),
    headless: true,
    defaultViewport: { width: 1100, height: 900 },
  });
  const pages = [];
  for (const file of files) {
    const page = await browser.newPage();
    const problems = [];
    page.on('console', (m) => { if (m.type() === 'error') problems.push(`console error: ${m.text()}`); });
    page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
    page.on('requestfailed', (r) => problems.push(`request failed: ${r.url()}`));
    page.on('request', (r) => { if (!r.url().startsWith('file:') && !r.url().startsWith('data:')) problems.push(`non-local request: ${r.url()}`); });
    await page.goto('file://' + path.join(htmlDir, file), { waitUntil: 'load' });
    await page.evaluate(() => document.fonts.ready);
    const info = await page.evaluate(() => {
      const imgs = [...document.images].map((i) => ({ src: i.getAttribute('src'), ok: i.complete && i.naturalWidth > 0 && i.naturalHeight > 0 }));
      const text = document.body.innerText;
      const raw = [];
      for (const pat of ['$$', '\\(', '\\[', '\\begin{']) if (text.includes(pat)) raw.push(pat);
      const links = [...document.querySelectorAll('a[href]')].map((a) => a.getAttribute('href'))
        .filter((h) => !/^[a-z]+:/.test(h));
      const ids = [...document.querySelectorAll('[id]')].map((e) => e.id);
      return { imgs, raw, links, ids, title: document.title, height: document.body.scrollHeight };
    });
    for (const im of info.imgs) if (!im.ok) problems.push(`image not loaded: ${im.src}`);
    for (const r of info.raw) problems.push(`raw TeX delimiter in the text: ${r}`);
    const stem = file.replace(/\.html$/, '');
    for (const old of fs.readdirSync(outDir)) if (old.startsWith(`${stem}.part`)) fs.unlinkSync(path.join(outDir, old));
    const shots = [];
    for (let y = 0, i = 1; y < info.height; y += SEGMENT, i += 1) {
      await page.setViewport({ width: 1100, height: Math.min(SEGMENT, info.height - y) });
      await page.evaluate((top) => window.scrollTo(0, top), y);
      const shot = path.join(outDir, i === 1 ? `${stem}.png` : `${stem}.part${i}.png`);
      await page.screenshot({ path: shot });
      shots.push(shot);
    }
    pages.push({ file, title: info.title, images: info.imgs.length, links: info.links, ids: info.ids, problems, height: info.height,
                 screenshot: shots[0], screenshots: shots });
    await page.close();
  }
  await browser.close();
  // links between pages (and to anchors on them) must resolve
  const idsOf = Object.fromEntries(pages.map((p) => [p.file, new Set(p.ids)]));
  for (const p of pages) {
    for (const href of p.links) {
      const [target, frag] = href.split('#');
      const file = target === '' ? p.file : target;
      if (file.endsWith('.html')) {
        if (!(file in idsOf)) p.problems.push(`broken link: ${href}`);
        else if (frag && !idsOf[file].has(decodeURIComponent(frag))) p.problems.push(`broken anchor: ${href}`);
      } else if (!fs.existsSync(path.join(htmlDir, decodeURIComponent(file)))) {
        p.problems.push(`broken link: ${href}`);
      }
    }
    delete p.ids;
  }
  fs.writeFileSync(path.join(outDir, 'report.json'), JSON.stringify({ htmlDir, pages }, null, 1));
})().catch((e) => { console.error(e); process.exit(1); });
