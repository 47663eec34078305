"""The HTML report's inline style and script (no network: nothing is loaded from elsewhere).

The script: the search box hides timeline narrations whose text does not contain the query
(case-insensitive; chapters stay when one of theirs matches) and shows "N of M"; clicking an
item seeks the video there; the narration under the playhead is highlighted.
"""

PAGE_STYLE = """
:root { color-scheme: light dark; --fg:#1d232a; --muted:#5f6b78; --bg:#f6f7f9; --card:#fff; --line:#dde2e8;
        --accent:#2563eb; --hit:#fff3bf; }
@media (prefers-color-scheme: dark) { :root { --fg:#e6e9ee; --muted:#9aa5b1; --bg:#15181c; --card:#1e2329;
        --line:#2e353d; --accent:#6ea8fe; --hit:#4a3f12; } }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg);
       background:var(--bg); }
header { padding:18px 24px 8px; }
h1 { margin:0 0 4px; font-size:22px; }
h2 { font-size:17px; margin:0 0 10px; }
.meta { margin:0; color:var(--muted); font-size:13px; }
main { display:grid; grid-template-columns:minmax(320px, 1fr) minmax(320px, 1fr); gap:16px; padding:8px 24px 32px; }
section { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
#player, #summary, #answers { grid-column:1; }
#timeline-section { grid-column:2; grid-row:1 / span 4; max-height:calc(100vh - 110px); overflow:auto; }
@media (max-width: 800px) { main { grid-template-columns:1fr; } #timeline-section { grid-column:1; grid-row:auto;
        max-height:none; } }
video { width:100%; border-radius:6px; background:#000; }
.novideo { color:var(--muted); margin:0; }
.qa { display:grid; grid-template-columns:48px 1fr; column-gap:8px; margin:0 0 10px; }
.qa time { grid-row:span 2; color:var(--muted); font-variant-numeric:tabular-nums; }
.qa p { margin:0; } .qa .q { font-weight:600; } .error { color:#d33; }
.search { display:flex; gap:10px; align-items:center; margin:0 0 10px; position:sticky; top:-14px;
          background:var(--card); padding:6px 0; }
#search { flex:1; font:inherit; padding:6px 10px; border:1px solid var(--line); border-radius:6px;
          background:var(--bg); color:var(--fg); }
#count { color:var(--muted); font-size:13px; white-space:nowrap; }
#timeline { list-style:none; margin:0; padding:0; }
#timeline li { border-top:1px solid var(--line); }
#timeline li.chapter h3 { font-size:15px; margin:12px 0 6px; }
#timeline li.chapter .n { color:var(--accent); }
#timeline li.chapter time { color:var(--muted); font-weight:400; margin:0 6px; font-variant-numeric:tabular-nums; }
#timeline li.narration { display:flex; gap:10px; padding:8px 4px; cursor:pointer; border-radius:6px; }
#timeline li.narration:hover { background:var(--bg); }
#timeline li.narration.now { background:var(--hit); }
#timeline li.narration img, .noimg { width:120px; min-width:120px; height:auto; border-radius:4px; }
#timeline li.narration time { color:var(--muted); font-size:12px; font-variant-numeric:tabular-nums; }
#timeline li.narration p { margin:2px 0 0; }
#timeline li.hidden { display:none; }
#timeline li.empty { color:var(--muted); padding:8px 0; }
"""

PAGE_SCRIPT = """
(function () {
  var video = document.getElementById('video');
  var search = document.getElementById('search');
  var count = document.getElementById('count');
  var items = Array.prototype.slice.call(document.querySelectorAll('#timeline li'));
  var narrations = items.filter(function (li) { return li.classList.contains('narration'); });
  function filter() {
    var q = search.value.trim().toLowerCase(), shown = 0, chapter = null, chapterHits = 0;
    function closeChapter() { if (chapter) chapter.classList.toggle('hidden', q !== '' && chapterHits === 0); }
    items.forEach(function (li) {
      if (li.classList.contains('chapter')) {
        closeChapter(); chapter = li; chapterHits = 0;
        if (q && li.textContent.toLowerCase().indexOf(q) >= 0) chapterHits++;
      } else if (li.classList.contains('narration')) {
        var hit = !q || li.querySelector('.text').textContent.toLowerCase().indexOf(q) >= 0;
        li.classList.toggle('hidden', !hit);
        if (hit) { shown++; chapterHits++; }
      }
    });
    closeChapter();
    count.textContent = q ? shown + ' of ' + narrations.length : narrations.length + ' narrations';
  }
  search.addEventListener('input', filter);
  filter();
  items.forEach(function (li) {
    li.addEventListener('click', function () {
      var t = parseFloat(li.getAttribute('data-t'));
      if (video && !isNaN(t)) { video.currentTime = t; video.play(); }
    });
  });
  if (video) {
    video.addEventListener('timeupdate', function () {
      var now = null;
      narrations.forEach(function (li) {
        if (parseFloat(li.getAttribute('data-t')) <= video.currentTime + 0.05) now = li;
      });
      narrations.forEach(function (li) { li.classList.toggle('now', li === now); });
    });
  }
})();
"""
