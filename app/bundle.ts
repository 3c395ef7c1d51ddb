// Where the program's own files are: embedded in the compiled binary (`bun build --compile`,
// build.ts) or on disk (run from sources, `bun app/main.ts`).

/**
 * True in the compiled binary: its entry is in the embedded file system (/$bunfs). Its modules'
 * import.meta.url says nothing: built with --bytecode, it names the source file on the build
 * machine, which need not exist where the binary runs.
 */
export const COMPILED = Bun.main.startsWith("/$bunfs/");

/**
 * A Worker entry file beside this one (build.ts embeds each as an entry point of the binary): in
 * the compiled binary, the relative name Bun resolves among its embedded files (a path or URL
 * from import.meta.url would name the build tree: "ModuleNotFound ... (entry point)" wherever
 * that is absent); from sources, the file's URL.
 */
export function threadEntry(file: string): string {
  return COMPILED ? `./${file}` : new URL(`./${file}`, import.meta.url).href;
}
