// Router (one page per #hash) and start-up. Each page module exports init() and show().
import * as dataset from "./dataset.js";
import * as train from "./train.js";
import * as compare from "./compare.js";
import * as runs from "./runs.js";
import * as evaluation from "./evaluation.js";
import * as estimate from "./estimate.js";
import { $, $$ } from "./util.js";

const PAGES = { dataset, train, compare, runs, eval: evaluation };

function route() {
  const name = (location.hash || "#dataset").slice(1).split("?")[0];
  const page = PAGES[name] ? name : "dataset";
  for (const section of $$(".page")) section.hidden = section.id !== `page-${page}`;
  for (const link of $$(".tabs a")) link.classList.toggle("active", link.dataset.page === page);
  PAGES[page].show();
}

async function start() {
  // uPlot is a classic deferred script; module scripts run after it, but be safe.
  if (!window.uPlot) await new Promise((resolve) => window.addEventListener("load", resolve, { once: true }));
  for (const page of Object.values(PAGES)) await page.init();
  estimate.init();  // the Train form's memory estimate (after the form is built)
  window.addEventListener("hashchange", route);
  route();
  document.body.dataset.ready = "1";
}

start();
export { $ };
